"""The App Engine SDK pieces the server uses, imported in one place.

The client (gmail.py) and the Django backend never need the SDK; the server
does.  Importing it here turns a missing SDK into one line that says what to
install, instead of a chain of "No module named 'google'" tracebacks.
"""

try:
    from google.appengine.api import apiproxy_stub_map, mail, mail_errors
    from google.appengine.runtime import apiproxy_errors
except ImportError:
    raise ImportError(
        "the appengine-mailer server needs the App Engine SDK: run `make run`, "
        "or `pip install '.[server]'` in the project's folder"
    ) from None

__all__ = ["apiproxy_errors", "apiproxy_stub_map", "mail", "mail_errors"]
