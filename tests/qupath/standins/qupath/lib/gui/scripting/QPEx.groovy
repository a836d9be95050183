package qupath.lib.gui.scripting

import qupath.lib.scripting.QP

/** Test stand-in for QuPath's QPEx (GUI module): in batch runs it answers exactly as QP does. */
class QPEx extends QP {
}
