"""Root conftest: keeps the project's test runs away from a user's own virtual rack state."""
