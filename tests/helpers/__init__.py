"""Helpers the test modules share: waiting for a condition, the services some tests need
(Redis, PostgreSQL), and the headless Chromium the browser tests drive."""
