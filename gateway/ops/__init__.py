"""Operations: the management listener (/metrics, /healthz, /readyz), metrics, alerts, the decision log,
systemd notification, and the boundary-server tools (doctor, namespace lab, bypass sentinel)."""
