"""inbox-exporter: verify connected inboxes over IMAP and SMTP and export why they fail."""

__version__ = "0.1.0"
