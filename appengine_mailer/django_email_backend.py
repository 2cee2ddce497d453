"""Django email backend that sends through an appengine-mailer proxy.

    EMAIL_BACKEND = "appengine_mailer.django_email_backend.GmailBackend"
    EMAIL_APPENGINE_PROXY_URL = "https://your-app.appspot.com/"
    EMAIL_APPENGINE_SECRET_KEY = "..."      # optional: defaults to SECRET_KEY
    EMAIL_APPENGINE_FIX_SENDER = False      # optional
    EMAIL_APPENGINE_CONCURRENCY = 8         # optional: messages sent at once
    EMAIL_TIMEOUT = 30                      # optional

It follows Django's backend contract: open()/close() (or ``with``) keep the
kept-alive connections for many messages, send_messages() returns how many were
sent, and fail_silently swallows sending failures but never a setting's.
send_messages() sends over up to `concurrency` connections at once
(gmail.GmailProxy.send_many); Django 6.1's MAILERS take the same names as OPTIONS.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.base import BaseEmailBackend

import gmail

_MISSING = object()


class GmailBackend(BaseEmailBackend):
    """Send each Django EmailMessage, Bcc included, as one signed POST to the proxy."""

    def __init__(
        self,
        proxy_url=None,
        secret_key=None,
        fix_sender=None,
        timeout=None,
        fail_silently=False,
        concurrency=None,
        **kwargs,
    ):
        # Django passes `alias` (6.x) here and rejects unknown options itself.
        super().__init__(**kwargs)
        self.fail_silently = fail_silently
        self.proxy_url = proxy_url or self._setting("EMAIL_APPENGINE_PROXY_URL")
        self.secret_key = (
            secret_key
            or getattr(settings, "EMAIL_APPENGINE_SECRET_KEY", None)
            or self._setting("SECRET_KEY", "EMAIL_APPENGINE_SECRET_KEY (or SECRET_KEY)")
        )
        self.fix_sender = bool(
            getattr(settings, "EMAIL_APPENGINE_FIX_SENDER", False) if fix_sender is None else fix_sender
        )
        self.timeout = (
            timeout if timeout is not None else (getattr(settings, "EMAIL_TIMEOUT", None) or gmail.DEFAULT_TIMEOUT)
        )
        self.concurrency = self._concurrency(concurrency)
        self._proxy: gmail.GmailProxy | None = None

    @staticmethod
    def _setting(name: str, label: str = "") -> str:
        value = getattr(settings, name, None)
        if not value:
            raise ImproperlyConfigured(f"GmailBackend needs the setting {label or name}")
        return value

    @staticmethod
    def _concurrency(value) -> int:
        label = "the option concurrency"
        if value is None:
            label, value = "EMAIL_APPENGINE_CONCURRENCY", getattr(settings, "EMAIL_APPENGINE_CONCURRENCY", None)
        if value is None:
            return gmail.DEFAULT_CONCURRENCY
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ImproperlyConfigured(f"GmailBackend needs {label} to be a whole number of at least 1, not {value!r}")
        return value

    def open(self) -> bool:
        """Connect to the proxy; True only if this call opened the connection."""
        if self._proxy is not None:
            return False
        proxy = gmail.GmailProxy(
            self.secret_key, self.proxy_url, fix_sender=self.fix_sender, fail_silently=False, timeout=self.timeout
        )
        try:
            proxy.open()
        except gmail.MessageSendingFailure:
            if not self.fail_silently:
                raise
            return False
        self._proxy = proxy
        return True

    def close(self) -> None:
        if self._proxy is not None:
            proxy, self._proxy = self._proxy, None
            proxy.close()

    def send_messages(self, email_messages) -> int:
        """Send the messages, up to `concurrency` at once; return how many the proxy accepted.

        A refused message never stops the others: without fail_silently the first
        failure is raised once all were tried, its `outcomes` saying what became of each.
        """
        if not email_messages:
            return 0
        opened = self.open()
        if self._proxy is None:
            return 0
        try:
            messages = [self.serialize(message) for message in email_messages if message.recipients()]
            try:
                outcomes = self._proxy.send_many(messages, self.concurrency)
            except gmail.MessageSendingFailure as failure:
                if not self.fail_silently:
                    raise
                outcomes = failure.outcomes or []
        finally:
            if opened:
                self.close()
        return sum(outcome.sent for outcome in outcomes)

    def check(self, message) -> dict:
        """Ask the proxy what sending `message` would do, without sending it (see the README's /check).

        Returns the proxy's report: `would_send`, every `problems` a send would
        meet, the sender, recipients, dropped headers and attachments.  Raises
        gmail.MessageSendingFailure when the proxy cannot answer (fail_silently
        is about sending, so it does not apply).
        """
        proxy = gmail.GmailProxy(
            self.secret_key, self.proxy_url, fix_sender=self.fix_sender, fail_silently=False, timeout=self.timeout
        )
        with proxy:
            return proxy.check(self.serialize(message))

    @staticmethod
    def serialize(message) -> bytes:
        """The bytes to send: Django's rendering plus a Bcc header, which the proxy delivers and removes."""
        mime = message.message()
        if message.bcc:
            del mime["Bcc"]
            mime["Bcc"] = ", ".join(message.bcc)
        return gmail.message_bytes(mime)
