"""OAuth 2.0 for inboxes that take no passwords: tokens (`tokens`), the SASL mechanisms that
carry them (`sasl`), and the one-time sign-in that yields a refresh token (`login`)."""
