"""hdb demo: one photo of a face in, that person in any scene or style out. Hugging Face Spaces runs this file.

The app lives in the package (hdb/app/); `python app.py --help` lists its options.
"""

from hdb.app.main import main

if __name__ == "__main__":
    main()
