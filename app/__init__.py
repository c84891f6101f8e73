"""charlm's HTTP service: FastAPI over the generation engine. Only HTTP concerns live here."""
