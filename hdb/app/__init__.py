"""The hdb demo (Gradio, Hugging Face Spaces ready), in four parts read in this order:

engine.py     the models every visitor shares (a PersonalPipeline and its lock), the GPU time asked for
visitors.py   each visitor's files and session
handlers.py   what each event of the page does
page.py       the page itself
main.py       the command line that starts it (`python app.py`, `python -m hdb.app`)
"""
