"""``python -m dmvae_lightning.study``."""

from dmvae_lightning.study.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
