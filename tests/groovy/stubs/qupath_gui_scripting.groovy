package qupath.lib.gui.scripting

import qupath.lib.scripting.QP

class QPEx extends QP {
}
