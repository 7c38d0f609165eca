"""The configuration format: every error is one line naming the path; defaults and presets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from inbox_exporter import config as cfg
from inbox_exporter.config import ConfigError, parse_config, schema

TESTDATA = Path(__file__).parent / "testdata" / "config"
ROOT = Path(__file__).parent.parent
ENV = {"SALES_PASSWORD": "s3cret-sales", "SUPPORT_PASSWORD": "s3cret-support",
       "SALES_RT": "refresh-token-sales", "SECRET": "client-secret"}


def invalid_cases():
    for path in sorted(TESTDATA.glob("invalid-*.yaml")):
        first = path.read_text().splitlines()[0]
        yield pytest.param(path, first.removeprefix("# error: "), id=path.stem)


@pytest.mark.parametrize("path,expected", list(invalid_cases()))
def test_an_invalid_config_is_one_line_naming_the_path(path, expected):
    with pytest.raises(ConfigError) as e:
        cfg.load_config(str(path), environ=ENV)
    assert str(e.value) == f"{path}: {expected}"
    assert "\n" not in str(e.value)


def load(text: str, environ=ENV):
    return parse_config(text, "config.yaml", environ)


def test_defaults_are_inherited_and_an_inbox_may_override_them():
    config = load("""
defaults:
  interval: 5m
  timeout: 10s
  test_email: {to: bcc@crm.example.com}
inboxes:
  - {name: a, email: a@example.com, password_env: SALES_PASSWORD, provider: gmail}
  - {name: b, email: b@example.com, password_env: SALES_PASSWORD, provider: gmail,
     interval: 30s, test_email: {to: other@crm.example.com}}
""")
    a, b = config.inboxes
    assert (a.interval, a.timeout, a.test_email_to) == (300, 10, "bcc@crm.example.com")
    assert (b.interval, b.timeout, b.test_email_to) == (30, 10, "other@crm.example.com")
    assert a.deadline == 40  # four step timeouts...
    assert b.deadline == 30  # ...but never longer than the interval


def test_a_preset_fills_servers_and_explicit_keys_win():
    config = load("""
inboxes:
  - name: g
    email: me@gmail.com
    password_env: SALES_PASSWORD
    provider: gmail
    smtp: {port: 465}
""")
    g = config.inboxes[0]
    assert (g.imap.host, g.imap.port, g.imap.security) == ("imap.gmail.com", 993, "ssl")
    # Port 465 without a security key means implicit TLS, not the preset's STARTTLS.
    assert (g.smtp.host, g.smtp.port, g.smtp.security) == ("smtp.gmail.com", 465, "ssl")
    assert g.provider == "gmail"
    assert g.username == "me@gmail.com"  # the email address unless a custom username is set


@pytest.mark.parametrize("security,imap_port,smtp_port", [
    ("ssl", 993, 465), ("starttls", 143, 587), ("none", 143, 587)])
def test_ports_default_from_security(security, imap_port, smtp_port):
    config = load(f"""
inboxes:
  - name: x
    email: x@example.com
    username: custom-login
    password_env: SALES_PASSWORD
    allow_plaintext_login: true
    imap: {{host: mail.example.com, security: {security}}}
    smtp: {{host: mail.example.com, security: {security}}}
""")
    x = config.inboxes[0]
    assert (x.imap.port, x.smtp.port) == (imap_port, smtp_port)
    assert x.username == "custom-login"
    assert x.provider == "other"


@pytest.mark.parametrize("host,provider", [
    ("outlook.office365.com", "outlook"), ("imap.gmail.com", "gmail"),
    ("imap.mail.me.com", "icloud"), ("mail.example.com", "other")])
def test_the_provider_label_is_derived_from_the_host(host, provider):
    config = load(f"""
inboxes:
  - {{name: x, email: x@example.com, password_env: SALES_PASSWORD,
     imap: {{host: {host}}}, smtp: {{host: {host}}}}}
""")
    assert config.inboxes[0].provider == provider


@pytest.mark.parametrize("name", ["gmail", "outlook", "microsoft365", "yahoo", "icloud",
                                  "fastmail", "zoho"])
def test_every_preset_the_docs_promise_exists(name):
    config = load(f"""
inboxes:
  - {{name: x, email: x@example.com, password_env: SALES_PASSWORD, provider: {name}}}
""")
    assert config.inboxes[0].imap.host and config.inboxes[0].smtp.host


def test_password_from_a_file_drops_the_trailing_newline(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    config = load(f"""
inboxes:
  - {{name: x, email: x@example.com, password_file: {pw}, provider: gmail}}
""")
    assert config.inboxes[0].password.get_secret_value() == "from-file"


def test_the_password_is_masked_when_an_inbox_is_printed():
    inbox = load("""
inboxes:
  - {name: x, email: x@example.com, password_env: SALES_PASSWORD, provider: gmail}
""").inboxes[0]
    assert "s3cret-sales" not in repr(inbox) and "s3cret-sales" not in str(inbox)


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("5m", 300), ("1h", 3600),
                                          ("1h30m", 5400), ("1m30s", 90), ("500ms", 0.5)])
def test_durations_use_the_prometheus_style(text, seconds):
    assert cfg.parse_duration(text) == seconds


def test_the_example_config_is_valid_and_shows_the_real_defaults():
    example = (ROOT / "config.example.yaml").read_text()
    env = {name: "x" for name in re.findall(r"(?:password|secret|token)_env: (\w+)", example)}
    config = parse_config(example, "config.example.yaml", env)
    assert config.inboxes
    defaults = yaml.safe_load(example)["defaults"]
    assert cfg.parse_duration(defaults["interval"]) == cfg.DEFAULT_INTERVAL
    assert cfg.parse_duration(defaults["timeout"]) == cfg.DEFAULT_TIMEOUT
    checks = yaml.safe_load(example)["checks"]
    for key, field in schema.ChecksModel.model_fields.items():
        if field.default is None:
            continue  # optional, shown commented out (checked below)
        value = checks[key]
        shown = cfg.parse_duration(value) if isinstance(value, str) else value
        assert shown == field.default, key
    # every key the models accept is shown (and so documented) in the example
    for model in (schema.InboxModel, schema.DefaultsModel, schema.ServerModel,
                  schema.TestEmailModel, schema.ChecksModel, schema.MetricsModel,
                  schema.AlertingModel, schema.SentryModel, schema.AlertmanagerModel,
                  schema.WebhookModel, schema.DeliveryModel, schema.AuthModel):
        for key in model.model_fields:
            assert re.search(rf"^\s*#?\s*(- )?{key}:", example, re.M), f"{model.__name__}.{key}"


def test_oauth_presets_fill_the_token_endpoint_and_the_scope_for_each_grant():
    config = load("""
defaults:
  auth: {method: oauth2, client_id: app-id, client_secret_env: SECRET}
inboxes:
  - {name: delegated, email: a@contoso.com, provider: outlook,
     auth: {tenant: contoso.onmicrosoft.com, refresh_token_env: SALES_RT}}
  - {name: app-only, email: b@contoso.com, provider: microsoft365,
     auth: {grant: client_credentials, tenant: contoso.onmicrosoft.com, mechanism: oauthbearer}}
  - {name: google, email: c@example.com, provider: gmail, auth: {refresh_token_env: SALES_RT}}
  - {name: organizations, email: d@contoso.com, provider: outlook, auth: {refresh_token_env: SALES_RT}}
""")
    delegated, app, google, org = (i.oauth for i in config.inboxes)
    assert delegated.token_url == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert delegated.scope == ("https://outlook.office.com/IMAP.AccessAsUser.All "
                               "https://outlook.office.com/SMTP.Send offline_access")
    assert (delegated.grant, delegated.mechanism, delegated.client_id) == (
        "refresh_token", "xoauth2", "app-id")
    assert delegated.refresh_token.get_secret_value() == "refresh-token-sales"
    assert app.scope == "https://outlook.office365.com/.default"
    assert (app.grant, app.mechanism, app.refresh_token) == ("client_credentials", "oauthbearer", None)
    assert app.client_secret.get_secret_value() == "client-secret"
    assert google.token_url == "https://oauth2.googleapis.com/token"
    assert google.scope == "https://mail.google.com/"
    assert ("access_type", "offline") in google.authorize_params
    assert "/organizations/" in org.token_url
    assert all(i.password is None for i in config.inboxes)
    # the refresh token is a secret like a password: redacted wherever an inbox's secrets are
    assert "refresh-token-sales" in config.inboxes[0].secrets()
    assert "refresh-token-sales" not in repr(config.inboxes[0])


def test_an_inbox_auth_overrides_defaults_key_by_key_and_plain_http_is_for_loopback_only():
    config = load("""
defaults:
  auth: {method: oauth2, token_url: "http://127.0.0.1:8443/token", client_id: shared, scope: mail}
inboxes:
  - {name: a, email: a@example.test, imap: {host: h}, smtp: {host: h},
     auth: {refresh_token_env: SALES_RT}}
  - {name: b, email: b@example.test, imap: {host: h}, smtp: {host: h}, password_env: SALES_PASSWORD,
     auth: {method: password}}
""")
    a, b = config.inboxes
    assert (a.oauth.token_url, a.oauth.client_id, a.oauth.scope) == (
        "http://127.0.0.1:8443/token", "shared", "mail")
    assert a.oauth.client_secret is None  # a public client
    assert b.oauth is None and b.password.get_secret_value() == "s3cret-sales"


def test_oauth_login_may_load_a_config_whose_refresh_token_file_does_not_exist_yet(tmp_path):
    text = f"""
inboxes:
  - {{name: m, email: m@contoso.com, provider: outlook,
     auth: {{method: oauth2, client_id: app, refresh_token_file: {tmp_path}/rt}}}}
"""
    with pytest.raises(ConfigError, match=r"inboxes\[m\]\.auth\.refresh_token_file: cannot read"):
        load(text)
    inbox = parse_config(text, "config.yaml", ENV, strict_secrets=False).inboxes[0]
    assert inbox.oauth.refresh_token is None and inbox.oauth.refresh_token_file == f"{tmp_path}/rt"


def test_security_none_with_a_password_needs_allow_plaintext_login_inbox_or_defaults():
    text = """
defaults: {allow_plaintext_login: %s}
inboxes:
  - {name: a, email: a@example.test, password_env: SALES_PASSWORD,
     imap: {host: mail.example.test, security: none}, smtp: {host: mail.example.test, security: none}}
  - {name: b, email: b@example.test, password_env: SALES_PASSWORD, allow_plaintext_login: true,
     imap: {host: mail.example.test, security: none}, smtp: {host: mail.example.test}}
"""
    a, b = load(text % "true").inboxes
    assert (a.imap.security, a.smtp.security, b.imap.security) == ("none", "none", "none")
    with pytest.raises(ConfigError, match=r"^config.yaml: inboxes\[a\]\.imap\.security: none sends"):
        load(text % "false")
    # An inbox that logs in with a token would give the token away the same way.
    oauth = """
inboxes:
  - {name: t, email: t@example.test, imap: {host: h, security: none}, smtp: {host: h},
     allow_plaintext_login: %s,
     auth: {method: oauth2, token_url: "https://idp.example/token", client_id: c,
            refresh_token_env: SALES_RT}}
"""
    with pytest.raises(ConfigError, match=r"none sends the access token in clear"):
        load(oauth % "false")
    assert load(oauth % "true").inboxes[0].password is None


def test_international_host_names_and_addresses_are_accepted_in_their_unicode_form():
    inbox = load("""
inboxes:
  - {name: x, email: jörg@bücher.example, username: joerg, password_env: SALES_PASSWORD,
     imap: {host: imap.bücher.example}, smtp: {host: smtp.straße.example},
     test_email: {to: bcc@crm.example.com}}
""").inboxes[0]
    assert (inbox.email, inbox.imap.host, inbox.smtp.host) == (
        "jörg@bücher.example", "imap.bücher.example", "smtp.straße.example")
