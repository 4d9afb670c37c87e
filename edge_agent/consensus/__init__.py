"""SDBFT light consensus: a pure state machine per node and an MQTT transport around it."""
