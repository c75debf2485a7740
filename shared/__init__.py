"""Code both sides of streambridge use: the event types, Redis keys, settings, codecs.

Imports nothing else of the project's: ``api`` and ``workers`` depend on it, never the reverse.
"""
