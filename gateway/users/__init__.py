"""Users: the people who log in."""
