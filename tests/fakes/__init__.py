"""Local stand-ins for the Replicate API and Supabase Storage, for tests (stdlib servers)."""
