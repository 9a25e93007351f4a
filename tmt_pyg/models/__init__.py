from .config import TMTConfig
from .sizing import count_parameters, match_parameters
from .tmt import TMTBlock, TMTModel, TMTOutput

__all__ = ["TMTConfig", "TMTModel", "TMTOutput", "TMTBlock", "count_parameters", "match_parameters"]
