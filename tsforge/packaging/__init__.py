"""From a model to a verified archive: `tsforge new`, export variants wanted, `archive`, `verify`, release tags."""
