"""``transferkit audit``: label issues, near-copies and leakage, outliers and class health of an
image folder, from the cached backbone features (``run`` for the command, ``checks`` for the
measurements, ``page`` for audit.html)."""

from transferkit.audit.config import AuditConfig
from transferkit.audit.findings import AuditResult, Finding
from transferkit.audit.run import audit, audit_index

__all__ = ["AuditConfig", "AuditResult", "Finding", "audit", "audit_index"]
