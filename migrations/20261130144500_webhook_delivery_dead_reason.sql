-- oncely: why a webhook delivery went to the dead letter without (or after) an answer that says so:
-- its endpoint was disabled, the endpoint cannot be sent to, it answered 410, it ran out of attempts.
-- Additive: never edit once applied.
ALTER TABLE oncely.webhook_deliveries ADD COLUMN dead_reason text;
