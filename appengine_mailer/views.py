"""The receiving end of the proxy's bounce reports, for Django projects.

The proxy forwards each App Engine bounce notification to GMAIL_BOUNCE_URL,
signed with signature v2 under its first key.  Point that URL at this view
(it needs no CSRF token: the signature is the proof), and connect to
appengine_mailer.signals.bounce_received.  The proxy signs with its first key;
the view checks EMAIL_APPENGINE_BOUNCE_KEYS (a list: give it the old and the new
key while keys rotate), else the key GmailBackend sends with,
EMAIL_APPENGINE_SECRET_KEY, else SECRET_KEY.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

import gmail

from .signals import bounce_received


@csrf_exempt
@require_POST
def bounce(request: HttpRequest) -> HttpResponse:
    """Verify a forwarded bounce and send `bounce_received`; 403 for anything the proxy did not sign."""
    keys = (
        getattr(settings, "EMAIL_APPENGINE_BOUNCE_KEYS", None)
        or getattr(settings, "EMAIL_APPENGINE_SECRET_KEY", None)
        or getattr(settings, "SECRET_KEY", None)
    )
    if not keys or (not isinstance(keys, (str, bytes)) and not all(str(key).strip() for key in keys)):
        raise ImproperlyConfigured(
            "appengine_mailer.views.bounce needs EMAIL_APPENGINE_BOUNCE_KEYS, EMAIL_APPENGINE_SECRET_KEY or SECRET_KEY"
        )
    try:
        msg = gmail.verify_request(request.POST, keys)
    except gmail.RequestNotVerified as refusal:
        return HttpResponse(f"{refusal}\n", status=403, content_type="text/plain; charset=utf-8")
    except ValueError as problem:  # a blank key: the setting, not the request
        raise ImproperlyConfigured(f"appengine_mailer.views.bounce: {problem}") from None
    try:
        report = json.loads(msg)
    except (ValueError, RecursionError):
        report = None
    if not (
        isinstance(report, dict)
        and report.get("event") == "bounce"
        and isinstance(report.get("original"), dict)
        and isinstance(report.get("notification"), dict)
    ):
        return HttpResponse("msg is not a bounce report\n", status=400, content_type="text/plain; charset=utf-8")
    bounce_received.send(sender=bounce, bounce=report, original=report["original"], notification=report["notification"])
    return HttpResponse(status=204)
