"""appengine-mailer client (work in progress)."""
import base64
import hashlib
import hmac

__version__ = "2.0.0"


def sign_v1(key: bytes, msg: bytes) -> str:
    """Return the v1 signature: base64(HMAC-SHA1(key, msg)), as the original README defines it."""
    return base64.b64encode(hmac.new(key, msg, hashlib.sha1).digest()).decode("ascii")
