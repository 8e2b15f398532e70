"""Loading, generating, checking and augmenting segmentation data."""
