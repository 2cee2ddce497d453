"""Django signals of the appengine-mailer package.

`bounce_received` is sent by appengine_mailer.views.bounce for each bounce the
proxy reports, with `bounce` (the whole report), `original` (the message that
bounced: from, to, cc, bcc, subject, message_id, text) and `notification` (the
bounce itself: from, to, subject, text).
"""

from django.dispatch import Signal

bounce_received = Signal()
