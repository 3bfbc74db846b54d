"""Source of the AWS slot Lambda (`handler.py`), packaged as-is by the AwsHub construct.

`handler.py` is the whole function: python3.12 runtime, boto3 from the runtime, no other
dependency. Its pure helpers (configuration parsing, slot order) import only the standard
library, so the construct can share them without boto3. See docs/aws-slots.md.
"""
