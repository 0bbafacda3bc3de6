"""Model management API: status, profiles, switch jobs, events, GPUs."""
