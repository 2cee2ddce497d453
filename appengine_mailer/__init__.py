"""appengine-mailer: the Django backend lives in appengine_mailer.django_email_backend."""
