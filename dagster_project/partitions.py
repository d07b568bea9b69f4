"""Partition definitions shared by every asset family."""

from dagster import DynamicPartitionsDefinition

# One partition per Visium slide folder under the data root; keys are registered by
# the slide discovery sensor (or `mihd materialize`) after validation.
slides_partitions = DynamicPartitionsDefinition(name="slides")
