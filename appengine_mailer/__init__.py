"""appengine-mailer's server modules and its Django backend.

This file imports nothing on purpose: `appengine_mailer.django_email_backend`
needs only gmail.py and Django, never the App Engine SDK that the server
modules (errors, form, signatures, fastparse, convert, delivery) import.
"""
