"""Request-tier adapter: `--schedule-policy prefix-aging` in each upstream scheduler."""
