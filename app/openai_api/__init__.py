"""OpenAI's legacy completions API over the engine: `protocol` (the wire models), `plan` (a request in
the engine's terms), `serving` (submission, and the response, whole or streamed). The routes are in
app/routes/openai.py."""
