"""An example bigjax plug-in. Importing it registers:

- model family `bag_of_words` (bigjax_plugin_example.model): mean of the token embeddings over the
  attention mask, one hidden layer, a classifier head;
- task `smoothed_classification` (bigjax_plugin_example.task): cross-entropy against label-smoothed
  targets, on the batches of bigjax's built-in `classification` data builder.

bigjax finds it through the entry point `example = "bigjax_plugin_example"` of the group
`bigjax.plugins` (see pyproject.toml).
"""

from bigjax_plugin_example import model, task  # noqa: F401  (registration happens at import)
from bigjax_plugin_example.model import BagOfWords, BagOfWordsConfig
from bigjax_plugin_example.task import SmoothedClassification, SmoothedClassificationConfig

__all__ = ["BagOfWords", "BagOfWordsConfig", "SmoothedClassification",
           "SmoothedClassificationConfig"]
