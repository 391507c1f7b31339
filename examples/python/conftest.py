# The intentd_env fixture: one control plane (embedded PostgreSQL, or the
# server named by INTENTD_TEST_DATABASE_URL) for the whole test session.
pytest_plugins = ["intentd.testing.pytest_plugin"]
