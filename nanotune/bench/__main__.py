from .vs_transformers import main

main()
