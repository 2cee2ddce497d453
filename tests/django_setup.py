"""Django configured once for every test module that needs it (the backend, the bounce view)."""

from __future__ import annotations

import warnings

import django
from django.conf import settings

DJANGO_SECRET = "django-project-secret-key-used-for-signing"

if not settings.configured:
    warnings.simplefilter("ignore", PendingDeprecationWarning)
    settings.configure(
        SECRET_KEY=DJANGO_SECRET,
        EMAIL_BACKEND="appengine_mailer.django_email_backend.GmailBackend",
        DEFAULT_FROM_EMAIL="webmaster@example.com",
        USE_TZ=True,
        ROOT_URLCONF="django_urls",
        ALLOWED_HOSTS=["testserver", "127.0.0.1", "localhost"],
    )
    django.setup()
