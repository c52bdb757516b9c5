"""The xPyD proxy: OpenAI-compatible front, endpoint discovery, P/D pairing policies, engine protocols."""
