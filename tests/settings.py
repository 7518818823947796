"""Settings for the test suite: the real settings with a throwaway key and fast hashing."""

import os
import uuid

# With REDIS_URL in the environment, this run (and the servers it starts, which inherit the
# environment) keeps to keys of its own, never a deployment's `carlos:` ones.
os.environ.setdefault("REDIS_PREFIX", f"test-run-{uuid.uuid4().hex[:8]}")

from carlos.settings import *  # noqa: F403

SECRET_KEY = "tests-only-not-secret"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Throwaway settings, no deployment: importing carlos.asgi must not refuse them (the tests that
# start real servers in child processes check the refusal with real settings).
REFUSE_TO_START_WRONG = False
