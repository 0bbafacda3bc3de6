"""POST /api/chat: one chat turn of a stored conversation."""
