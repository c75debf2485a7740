"""The HTTP side of streambridge: the API (auth, chats) and the SSE edge."""
