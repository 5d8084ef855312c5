"""Writing, loading and publishing a cqil export (a Hugging Face folder with remote code)."""
