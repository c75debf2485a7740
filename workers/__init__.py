"""The arq worker: runs chats against an OpenAI-compatible LLM and appends their events."""
