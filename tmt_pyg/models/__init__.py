from .config import TMTConfig
from .tmt import TMTBlock, TMTModel, TMTOutput

__all__ = ["TMTConfig", "TMTModel", "TMTOutput", "TMTBlock"]
