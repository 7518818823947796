"""Django settings for Carlos.

Everything that differs between machines comes from the environment (or a local `.env`
file) through django-environ; `.env.example` lists every variable.
"""

import os
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DJANGO_DEBUG", default=False)
# A development key is only acceptable while DEBUG is on; production must set its own (outside
# DEBUG, carlos.startup refuses to serve with a missing or weak one). Read as written:
# django-environ takes a value that starts with `$` for the name of another variable, and
# Django's key generator (the README's command) starts one key in 50 with `$`.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "") or (
    "dev-insecure-carlos-key-change-me" if DEBUG else ""
)
ALLOWED_HOSTS = [
    host
    for host in env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
    if host
]
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
# WebSocket handshakes must come from this site's own pages: an Origin equal in scheme, host and
# port to the address the socket was opened on (its Host in ALLOWED_HOSTS), or one of these full
# origins (scheme://host[:port], e.g. a front end on another address; https://*.example.com for
# a domain and its subdomains). Default: CSRF_TRUSTED_ORIGINS. See carlos/socket_origins.py.
WS_ALLOWED_ORIGINS = env.list("DJANGO_WS_ALLOWED_ORIGINS", default=list(CSRF_TRUSTED_ORIGINS))

# --- Production behind TLS --------------------------------------------------------------------
# `manage.py serve` speaks plain HTTP: in production a reverse proxy terminates TLS in front of
# it and says so in X-Forwarded-Proto (it must set that header, not pass the client's on).
# Outside DEBUG the defaults are what such a deployment needs, so that `check --deploy` is
# clean. Only the redirect waits for DJANGO_BEHIND_PROXY (behind a proxy Django cannot ask, it
# would redirect forever); until one of the two is set, carlos.startup refuses to serve.
BEHIND_PROXY = env.bool("DJANGO_BEHIND_PROXY", default=False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if BEHIND_PROXY else None
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=BEHIND_PROXY and not DEBUG)
# Browsers keep HSTS for this long; an hour to start, a year (31536000) once every page and
# subdomain is HTTPS-only (the preload lists need a year, so `preload` stays inert until then).
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0 if DEBUG else 3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool(
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG
)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=not DEBUG)
SESSION_COOKIE_SECURE = env.bool("DJANGO_SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("DJANGO_CSRF_COOKIE_SECURE", default=not DEBUG)
# Check ids an operator has decided to accept, e.g. "security.W021" (no HSTS preload).
SILENCED_SYSTEM_CHECKS = env.list("DJANGO_SILENCED_SYSTEM_CHECKS", default=[])

INSTALLED_APPS = [
    # First, so that its `runserver` (which starts the simulator and warms the pools) wins over
    # Daphne's, which wins over Django's; its commands: serve, runserver.
    "carlos",
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "axes",  # login throttling: the block at the end of this file
    "pools",
    "agents",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Answers the login attempt that reaches the limit (login throttling, end of this file).
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "carlos.urls"
ASGI_APPLICATION = "carlos.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
}
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=0))
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Many designs write at once: WAL lets readers run beside the writer, IMMEDIATE takes
    # the write lock up front (no upgrade deadlocks), and writers wait instead of failing
    # with "database is locked" (measured: 200 concurrent designs, none lost).
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").is_dir() else []

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "login"

# With REDIS_URL set, several Carlos processes form one cluster: pool capacity, breaker
# state and live design streams are shared through Redis (a browser on instance B sees a
# design running on instance A). Without it, each process stands alone.
REDIS_URL = env.str("REDIS_URL", default="")
# Every key Carlos writes starts with this: two clusters can share one Redis database.
REDIS_PREFIX = env.str("REDIS_PREFIX", default="carlos")
# A page's socket queue holds this many events before the layer drops new ones (the default
# 100 is two seconds of one design's live tokens when the server is busy).
CHANNEL_CAPACITY = 1000
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_URL],
                "prefix": f"{REDIS_PREFIX}:channels",
                "capacity": CHANNEL_CAPACITY,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "carlos.channel_layers.LocalChannelLayer",
            "CONFIG": {"capacity": CHANNEL_CAPACITY},
        }
    }

# A line written while a span is current (a design's agents and calls, with telemetry on) ends
# with its ids, ` [trace=<32 hex> span=<16 hex>]`, to find in the tracing backend; else nothing.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "trace_context": {"()": "carlos.telemetry.TraceContextFilter"},
        "misleading_daphne_lines": {"()": "carlos.logs.DropMisleadingDaphneLines"},
    },
    "formatters": {
        "plain": {
            "format": "%(asctime)s %(levelname)s %(name)s: %(message)s%(trace_context)s",
            "defaults": {"trace_context": ""},
        }
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["trace_context"],
        }
    },
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {
        # One handler per line: Django's own default gives "django" a console handler of its
        # own in DEBUG, which printed every django.request line a second time, unformatted.
        "django": {"handlers": [], "level": "NOTSET", "propagate": True},
        # "HTTP/2 support not enabled" at every start, "Killed 0 ..." at every stop (carlos.logs).
        "daphne.server": {"filters": ["misleading_daphne_lines"]},
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        # The telemetry exporters' HTTP clients: a line per export otherwise.
        "urllib3": {"level": "WARNING"},
        "azure": {"level": "WARNING"},
    },
}

# --- LLM endpoint and pools ---------------------------------------------------------------
# One upstream for every pool. Azure OpenAI when AZURE_OPENAI_ENDPOINT is set; otherwise any
# OpenAI-compatible server at LLM_BASE_URL; otherwise the project's offline simulator.
LLM_SIMULATOR_HOST = env("LLM_SIMULATOR_HOST", default="127.0.0.1")
LLM_SIMULATOR_PORT = env.int("LLM_SIMULATOR_PORT", default=8765)


# The pools' defaults live in pools/engine/config.py, on its config dataclasses: CARLOS_POOLS
# holds only what the environment sets. Values stay text here so that a typo becomes a
# system-check error naming the variable, not a traceback while settings load.
_POOL_KEYS = (
    "SIZE",
    "MAX_OVERFLOW",
    "TIMEOUT",
    "MAX_WAITING",
    "FIRST_TOKEN_TIMEOUT",
    "IDLE_TIMEOUT",
    "CALL_TIMEOUT",
    "MAX_RETRIES",
    "ADAPTIVE",
    "MIN_CONCURRENCY",
    "MAX_CONCURRENCY",
)
_HTTP_KEYS = (
    "MAX_CONNECTIONS",
    "MAX_KEEPALIVE_CONNECTIONS",
    "KEEPALIVE_EXPIRY",
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
)


def _set_in_env(**variables: str) -> dict[str, str]:
    """`{key: value}` for each `key=VARIABLE` whose variable the environment sets."""
    return {key: env.str(name) for key, name in variables.items() if name in env}


def _pool_env(name: str, model_variable: str) -> dict[str, str]:
    """One pool's settings, each overridable as POOL_<NAME>_<KEY> (e.g. POOL_MAIN_SIZE)."""
    prefix = f"POOL_{name.upper()}_"
    return _set_in_env(MODEL=model_variable, **{key: prefix + key for key in _POOL_KEYS})


CARLOS_POOLS = {
    "ENDPOINT": {
        "SIMULATOR_URL": env(
            "LLM_SIMULATOR_URL", default=f"http://{LLM_SIMULATOR_HOST}:{LLM_SIMULATOR_PORT}/v1"
        ),
        **_set_in_env(
            AZURE_ENDPOINT="AZURE_OPENAI_ENDPOINT",
            AZURE_API_KEY="AZURE_OPENAI_API_KEY",
            AZURE_API_VERSION="AZURE_OPENAI_API_VERSION",
            BASE_URL="LLM_BASE_URL",
            API_KEY="LLM_API_KEY",
            CA_BUNDLE="LLM_CA_BUNDLE",
        ),
    },
    # The design note's single size knob (POOL_SIZE): main and mini get it, ronei half of it;
    # requests/tokens per minute per deployment, e.g. "gpt-4o=600/150000,gpt-4o-mini=1000".
    **_set_in_env(SIZE="POOL_SIZE", RATE_LIMITS="LLM_RATE_LIMITS"),
    "HTTP": _set_in_env(**{key: f"HTTP_{key}" for key in _HTTP_KEYS}),
    "CLUSTER": {
        "REDIS_URL": REDIS_URL,
        "PREFIX": REDIS_PREFIX,
        **_set_in_env(LEASE_SECONDS="POOL_LEASE_SECONDS", REDIS_TIMEOUT="REDIS_TIMEOUT"),
    },
    "POOLS": {
        "main": _pool_env("main", "AZURE_OPENAI_DEPLOYMENT_NAME"),
        "ronei": _pool_env("ronei", "AZURE_OPENAI_DEPLOYMENT_NAME"),
        "mini": _pool_env("mini", "AZURE_OPENAI_MINI_DEPLOYMENT_NAME"),
    },
}

# --- Web pages: design requests, live design pages (agents app, issue 3) ----------------------
# Longest request text the form accepts (the form states the number).
DESIGN_MAX_CHARS = env.int("DESIGN_MAX_CHARS", default=4000)
# Designs one user may submit per sliding hour; past it the form answers 429 with the time.
DESIGNS_PER_HOUR = env.int("DESIGNS_PER_HOUR", default=10)
# Designs one process runs at once; the others wait, queued, in order (see agents.tasks).
MAX_RUNNING_DESIGNS = env.int("MAX_RUNNING_DESIGNS", default=50)
# Page requests in Django at once, and how many more may wait their turn before a 503
# (carlos/admission.py); health probes and WebSockets are not counted. In the load test
# (README, issue 16), with 3-4 hops to a thread per page: 4 gave /health p99 49 ms and
# pages p99 5.6-6.6 s; 8 gave 63 ms and 4.1-4.9 s; 16 gave 88-125 ms and 3.0-4.9 s.
MAX_CONCURRENT_REQUESTS = env.int("MAX_CONCURRENT_REQUESTS", default=8)
MAX_WAITING_REQUESTS = env.int("MAX_WAITING_REQUESTS", default=1000)

# Content Security Policy (Django's own middleware): the pages show model output, which is
# untrusted. It is sanitised on the server; this is the second line: no inline or foreign
# scripts, no plugins, no framing, sockets and fetches to this site only. Mermaid's SVG
# diagrams carry inline <style> elements, hence 'unsafe-inline' for styles only.
from django.utils.csp import CSP  # noqa: E402

MIDDLEWARE = [*MIDDLEWARE, "django.middleware.csp.ContentSecurityPolicyMiddleware"]
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF, CSP.UNSAFE_INLINE],
    "img-src": [CSP.SELF, "data:"],
    "connect-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.NONE],
    "frame-ancestors": [CSP.NONE],
    "form-action": [CSP.SELF],
}

# --- Design pipeline (agents app, issue 3) ------------------------------------------------
# What the offline simulator says: each Carlos agent's plausible, deterministic answer.
LLM_SIMULATOR_RESPONDER = env(
    "LLM_SIMULATOR_RESPONDER", default="agents.simulated.carlos_responder"
)
# Revision rounds a NEEDS REVISION verdict may trigger before the pipeline goes on anyway.
DESIGN_MAX_REVISIONS = env.int("DESIGN_MAX_REVISIONS", default=1)

# --- Durable designs (agents.leases, issue 12) ------------------------------------------------
# A process works on a design only while it holds the design's lease in the database,
# renewed every third of DESIGN_LEASE_SECONDS; a dead process's designs are taken over by
# the other instances' sweepers (every DESIGN_SWEEP_SECONDS) once its leases have expired,
# and resumed from their last finished agent. A design whose process died
# DESIGN_MAX_TAKEOVERS times ends failed. Instances need clocks in step (NTP) to well
# within the lease time.
# None when the environment leaves one out: agents.leases.LeaseSettings holds the defaults.
DESIGN_LEASE_SECONDS = env.float("DESIGN_LEASE_SECONDS", default=None)
DESIGN_SWEEP_SECONDS = env.float("DESIGN_SWEEP_SECONDS", default=None)
DESIGN_MAX_TAKEOVERS = env.int("DESIGN_MAX_TAKEOVERS", default=None)
# On SIGTERM or Ctrl-C, how long running agents may take to finish before the server stops
# them, saves what they streamed and hands their designs on to resume.
DRAIN_SECONDS = env.float("DRAIN_SECONDS", default=None)
# A design waiting for answers to its clarifying questions goes on without them after this
# many seconds (24 h), the questions marked skipped.
QUESTIONS_TIMEOUT = env.float("QUESTIONS_TIMEOUT", default=None)

# --- Pool history and Prometheus metrics (pools app, issue 4) ------------------------------
# Each server process saves one PoolSnapshot row per pool every POOL_SNAPSHOT_INTERVAL
# seconds (0 turns the sampler off, e.g. when cron runs `manage.py snapshot_pools`), with
# ±POOL_SNAPSHOT_JITTER (a fraction) so several processes do not write at the same instant.
POOL_SNAPSHOT_INTERVAL = env.float("POOL_SNAPSHOT_INTERVAL", default=30.0)
POOL_SNAPSHOT_JITTER = env.float("POOL_SNAPSHOT_JITTER", default=0.1)
# What `manage.py prune_pool_snapshots` removes by default: rows older than this (12h, 30d, 90m).
POOL_SNAPSHOT_RETENTION = env.str("POOL_SNAPSHOT_RETENTION", default="30d")
# /metrics is open unless restricted: a bearer token, and/or client addresses or networks
# (comma-separated, e.g. "127.0.0.1,10.0.0.0/8"); when both are set, both must match.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
METRICS_ALLOWED_IPS = env.list("METRICS_ALLOWED_IPS", default=[])

# --- Login throttling (carlos/login.py, django-axes, issue 13) -------------------------------
# Failed logins are counted per account and per client address, in the database (axes'
# AccessAttempt table: shared by every instance, kept across restarts, and emptied with the
# test database after each test, so no lockout leaks from one test into the next).
# LOGIN_FAILURE_LIMIT failures within LOGIN_COOLOFF_MINUTES lock that account, and that
# address, out of logging in: 429 with Retry-After until enough of them are older than the
# cool-off. Attempts during a lockout are refused before any hashing and are not counted: the
# lockout does not grow while someone keeps trying, and a guesser gets LOGIN_FAILURE_LIMIT
# guesses per cool-off either way. A good login wipes nothing (with the address counted, a
# guesser's own good login would wipe its guesses at others' accounts). The address is the
# connection's (REMOTE_ADDR), or behind a TLS proxy the one it appended to X-Forwarded-For.
from datetime import timedelta  # noqa: E402

AUTHENTICATION_BACKENDS = [
    "carlos.login.ThrottledBackend",  # refuses a locked-out account or address, first
    "django.contrib.auth.backends.ModelBackend",
]
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"
AXES_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("LOGIN_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]  # either one reaching the limit locks
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_RESET_ON_SUCCESS = False
AXES_LOCKOUT_CALLABLE = "carlos.login.lockout_response"
AXES_CLIENT_STR_CALLABLE = "carlos.login.describe_client"  # the log names no account in clear
AXES_VERBOSE = False  # no banner in every manage.py command's output
if env.bool("DJANGO_BEHIND_PROXY", default=False):
    # REMOTE_ADDR is then the proxy's, for every client: the address the proxy appended to
    # X-Forwarded-For counts instead.
    AXES_CLIENT_IP_CALLABLE = "carlos.login.forwarded_client_address"
# Passwords are hashed at low CPU priority (Django's PBKDF2, the same hashes; carlos/login.py):
# under a storm on a busy machine the hashing waits for the pages, not the other way round.
PASSWORD_HASHERS = [
    "carlos.login.PBKDF2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.BCryptSHA256PasswordHasher",
    "django.contrib.auth.hashers.ScryptPasswordHasher",
]
# Logins decided at once (each hashes a password for about half a second of one core); the
# others wait their turn outside the page gate. By default every core but one, so that a
# login storm always leaves a core to the pages (README: `manage.py loginstorm`).
MAX_CONCURRENT_LOGINS = env.int(
    "MAX_CONCURRENT_LOGINS", default=max(1, (os.process_cpu_count() or 1) - 1)
)
