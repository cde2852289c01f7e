"""The torch front end: functional hypergrad / unroll."""
