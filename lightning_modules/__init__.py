"""The All Convolutional Net family (torch only) and its LightningModule."""
