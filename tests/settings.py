"""Settings for the test suite: the real settings with a throwaway key and fast hashing."""

from carlos.settings import *  # noqa: F403

SECRET_KEY = "tests-only-not-secret"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Throwaway settings, no deployment: importing carlos.asgi must not refuse them (the tests that
# start real servers in child processes check the refusal with real settings).
REFUSE_TO_START_WRONG = False
