"""Serving: the OpenAI wire format (`openai_api`), the HTTP server (`server`) and the
`jpaged` command (`cli`)."""
