"""maillab: real Dovecot + Postfix for tests, private to one work directory.

    from maillab import MailLab, LabError
    with MailLab(tmp_path / "lab") as lab:
        lab.ports.imaps, lab.ca_file, lab.users["alice"].password, ...
        lab.oauth.refresh_token_for("alice"), lab.ports.imaps_oauth, ...

See lab/README.md for what is started and the quirks behind the config.
"""
from .errors import LabError
from .lab import APP_PASSWORD_REASON, LabUser, MailLab, Ports
from .oauth import OAuthClient, OAuthError, OAuthServer
from .tls import TlsFiles

__all__ = ["APP_PASSWORD_REASON", "LabError", "LabUser", "MailLab", "OAuthClient", "OAuthError",
           "OAuthServer", "Ports", "TlsFiles"]
