"""Alerting: transitions of each inbox between ok and failing, sent to sinks off the check path.

transitions.py decides *when* (thresholds, category changes, flapping); dispatch.py delivers
(a bounded queue and a worker per sink, retries with backoff); one module per sink says *how*.
"""
