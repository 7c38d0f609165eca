"""maillab: real Dovecot + Postfix for tests, private to one work directory.

    from maillab import MailLab, LabError
    with MailLab(tmp_path / "lab") as lab:
        lab.ports.imaps, lab.ca_file, lab.users["alice"].password, ...

See lab/README.md for what is started and the quirks behind the config.
"""
from .errors import LabError
from .lab import APP_PASSWORD_REASON, LabUser, MailLab, Ports
from .tls import TlsFiles

__all__ = ["MailLab", "LabError", "LabUser", "Ports", "TlsFiles", "APP_PASSWORD_REASON"]
