"""Conversations and their messages: history kept in the database, owned by one user."""
