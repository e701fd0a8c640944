"""The admins' HTTP side: results API, dashboard page, health and metrics (one FastAPI app)."""
