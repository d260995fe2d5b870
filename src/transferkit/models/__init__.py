"""timm backbones with a new head: creation, freezing, the bottom/top split and the model folder."""
