from .config import TMTConfig
from .sizing import count_parameters, match_parameters
from .layer import TMTLayer
from .tmt import TMTModel, TMTOutput

__all__ = ["TMTConfig", "TMTModel", "TMTOutput", "TMTLayer", "count_parameters", "match_parameters"]
